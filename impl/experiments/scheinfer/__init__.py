"""ScheInfer's experiments: the command line that generates, benchmarks and calibrates with the
hybrid engine (`python -m impl.experiments.scheinfer`) and the sim tier at real model shapes
(`python -m impl.experiments.scheinfer.sim`). Both import the baselines they compare with, which
registers their engine policies ('fiddler', 'layers')."""
