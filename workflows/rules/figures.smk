# Figures and tables: tidy CSVs in, PDF + PNG (and markdown tables) out, no computation.
# Cheap, so they run on the submitting machine even under a cluster executor.


localrules:
    plot_fsmoe,
    plot_hiermoe_table2,
    plot_hiermoe_fig9,
    plot_hiermoe_sim,


rule plot_hiermoe_table2:
    """HierMoE Table II as a figure (ours beside the closed form and the paper) and a
    markdown table of the differences."""
    input:
        code=code_inputs("figures.hiermoe_table2"),
        csv=rules.hiermoe_table2.output.csv,
    output:
        pdf="results/figures/hiermoe_table2.pdf",
        png="results/figures/hiermoe_table2.png",
        md="results/figures/hiermoe_table2.md",
    log:
        "results/logs/figures/hiermoe_table2.log",
    threads: 1
    resources:
        runtime=5,
        mem_mb=2000,
    shell:
        "python -m figures.hiermoe_table2 --csv {input.csv}"
        " --out-pdf {output.pdf} --out-png {output.png} --out-md {output.md} > {log} 2>&1"


rule plot_hiermoe_fig9:
    """HierMoE Fig. 9: the paper's alpha-beta fits beside our calibration of this machine."""
    input:
        code=code_inputs("figures.hiermoe_fig9"),
        profile=calibration_profile(),
        paper=paper_csv("hiermoe_fig9"),
    output:
        pdf="results/figures/hiermoe_fig9.pdf",
        png="results/figures/hiermoe_fig9.png",
        md="results/figures/hiermoe_fig9.md",
    log:
        "results/logs/figures/hiermoe_fig9.log",
    threads: 1
    resources:
        runtime=5,
        mem_mb=2000,
    shell:
        "python -m figures.hiermoe_fig9 --profile {input.profile}"
        " --out {output.pdf} --out-md {output.md} > {log} 2>&1"


rule plot_hiermoe_sim:
    """HierMoE Figs. 10-13, Table IV, the ablations, the skew figure and the paper-vs-ours report
    (which also links Table II and Fig. 9, and includes the emulated-cluster table: this results
    folder's own after `make emu`, else the committed reference)."""
    input:
        code=code_inputs("figures.hiermoe_sim"),
        qwen3="results/raw/hiermoe_sim/qwen3.csv",
        deepseek="results/raw/hiermoe_sim/deepseek.csv",
        deepseek_ablation="results/raw/hiermoe_sim/deepseek-ablation.csv",
        node="results/raw/hiermoe_sim/node.csv",
        table4="results/raw/hiermoe_sim/table4.csv",
        ablation="results/raw/hiermoe_sim/ablation.csv",
        persistent="results/raw/hiermoe_sim/ablation-persistent.csv",
        long="results/raw/hiermoe_sim/ablation-long.csv",
        long_persistent="results/raw/hiermoe_sim/ablation-long-persistent.csv",
        skew="results/raw/hiermoe_sim/skew.csv",
        swap=rules.hiermoe_swap_measure.output.csv,
        swap_gap=expand("results/raw/hiermoe_swap_gap/{run}.csv", run=SWAP_GAP_RUNS),
        table2_csv=rules.hiermoe_table2.output.csv,
        table2=rules.plot_hiermoe_table2.output.md,
        fig9=rules.plot_hiermoe_fig9.output.md,
        emu_reference=repo_path(EMU_REFERENCE_TABLE),
        paper=[paper_csv(n) for n in ("hiermoe_fig9", "hiermoe_fig10", "hiermoe_fig11", "hiermoe_table2",
                                      "hiermoe_table4", "hiermoe_ablation", "hiermoe_swap")],
    params:
        # not an input: that would tie `make run` to the hour-long emu jobs that made the table
        emu=lambda wildcards: emu_table(),
    output:
        figures=[
            f"results/figures/hiermoe_{name}.{ext}"
            for name in ("fig10", "fig11", "fig12", "fig13", "table4", "skew")
            for ext in ("pdf", "png")
        ],
        report="results/figures/hiermoe_report.md",
    log:
        "results/logs/figures/hiermoe_sim.log",
    threads: 1
    resources:
        runtime=5,
        mem_mb=2000,
    shell:
        "python -m figures.hiermoe_sim --qwen3 {input.qwen3} --deepseek {input.deepseek}"
        " --deepseek-ablation {input.deepseek_ablation} --node {input.node}"
        " --table4 {input.table4} --ablation {input.ablation} --ablation-persistent {input.persistent}"
        " --ablation-long {input.long} --ablation-long-persistent {input.long_persistent}"
        " --skew {input.skew} --swap {input.swap} --swap-gap {input.swap_gap} --table2-csv {input.table2_csv} --table2-md {input.table2}"
        " --fig9-md {input.fig9} --emu-md {params.emu}"
        " --out-dir results/figures > {log} 2>&1"


rule plot_fsmoe:
    """FSMoE Fig. 5, Table 2, Table 5, Figs. 6-8, Table 6, every figure's gains under lane contention and the
    paper-vs-ours report."""
    input:
        code=code_inputs("figures.fsmoe"),
        grid=expand("results/raw/fsmoe/grid-{testbed}.csv", testbed=FSMOE_TESTBEDS),
        statistic="results/raw/fsmoe/statistic.csv",
        table2="results/raw/fsmoe/table2.csv",
        models="results/raw/fsmoe/models.csv",
        order="results/raw/fsmoe/order.csv",
        ablation_grids=expand("results/raw/fsmoe/ablation-{r}-grid.csv", r=FSMOE["ablation_readings"]),
        ablation_models=expand("results/raw/fsmoe/ablation-{r}-models.csv", r=FSMOE["ablation_readings"]),
        ablation_table2=expand("results/raw/fsmoe/ablation-{r}-table2.csv", r=FSMOE["ablation_readings"]),
        links="results/raw/fsmoe/links.csv",
        degrees=repo_path("figures/reference/fsmoe_degree_methods.csv"),
        emu="results/raw/fsmoe/emu.csv",
        profile="resources/calibration/fsmoe-2x2-gloo.yaml",
        paper=[paper_csv(n) for n in ("fsmoe_table2", "fsmoe_table5", "fsmoe_statistic", "fsmoe_fig5", "fsmoe_fig6",
                                      "fsmoe_fig7", "fsmoe_fig8", "fsmoe_table6", "fsmoe_table3", "fsmoe_solver")],
    output:
        figures=[
            f"results/figures/fsmoe_{name}.{ext}"
            for name in ("fig5", "table2", "table5", "grid_speedups", "fig6", "fig7", "fig8", "table6", "contention")
            for ext in ("pdf", "png")
        ],
        report="results/figures/fsmoe_report.md",
    log:
        "results/logs/figures/fsmoe.log",
    threads: 1
    resources:
        runtime=5,
        mem_mb=2000,
    shell:
        "python -m figures.fsmoe --grid {input.grid} --statistic {input.statistic} --table2 {input.table2}"
        " --models {input.models} --order {input.order} --links {input.links} --ablation-grids {input.ablation_grids}"
        " --ablation-models {input.ablation_models} --ablation-table2 {input.ablation_table2}"
        " --degrees {input.degrees} --emu {input.emu} --profile {input.profile} --out-dir results/figures > {log} 2>&1"
