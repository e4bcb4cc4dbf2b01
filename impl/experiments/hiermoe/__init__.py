"""HierMoE's experiments: Table II (`table2`), the sim-tier runs of Figs. 10-13, Table IV and the
ablations (`sim`) on the synthetic routing stream of `workload`."""
