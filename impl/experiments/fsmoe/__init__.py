"""FSMoE's experiments: the plan CLI (`plan`), the degree-method comparison (`degrees`), and the
configured-layer grid and real-model runs of Table 5 and Figs. 6-8."""
