"""Tutel with PipeMoE's adaptive pipeline degree, Tutel-Improved and PipeMoE+Lina: the pipelined
baselines of the FSMoE paper, as plans on FSMoE's timeline and executor (`plans`)."""
