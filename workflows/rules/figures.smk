# Figures and tables: tidy CSVs in, PDF + PNG (and markdown tables) out, no computation.
# Cheap, so they run on the submitting machine even under a cluster executor.


localrules:
    plot_hiermoe_table2,


rule plot_hiermoe_table2:
    """HierMoE Table II as a figure (ours beside the closed form and the paper) and a
    markdown table of the differences."""
    input:
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
    conda:
        "../../environment.yml"
    shell:
        "python -m figures.hiermoe_table2 --csv {input.csv}"
        " --out-pdf {output.pdf} --out-png {output.png} --out-md {output.md} > {log} 2>&1"
