"""Put what one `gpu_check.sh` run brought back into figures/reference/ under the names the suite
reads (the ScheInfer report picks up the bench, its record and the measured hardware class), and
write the reference README's rows for them from the run's own records (device, date, commit,
command), so that nothing about the run is typed by hand. The records' `outputs` entries are
renamed with their files (after each file is checked against its entry), so the readers' check of
a CSV against its record holds for the committed pair too.

    python workflows/scripts/commit_gpu_evidence.py --from RESULT_DIR --card h100 [--to figures/reference]

then review and commit figures/reference/. A dry run's files (no GPU: tier 'emu') are refused
unless --allow-dry-run (for rehearsals into a scratch --to folder).
"""
from __future__ import annotations

import re
import shlex
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# what the run writes -> (the name it is committed under, what it is); {card} filled in
FILES = {
    "c_bench.csv": ("scheinfer_gpu_bench.csv", "ScheInfer and Fiddler (our engine) against llama.cpp at each offload "
                    "setting, prefill and decode tok/s per round, on a generated Mixtral-style F32 model under one "
                    "GPU budget; read by the ScheInfer report"),
    "c_bench.json": ("scheinfer_gpu_bench.json", "the bench's run record (budget enforcement per system, ratios, "
                     "offload command lines, versions)"),
    "d_scheinfer_hardware.yaml": ("scheinfer_gpu_hardware.yaml", "the GPU machine as a ScheInfer sim hardware class "
                                  "(measured GEMM, memory and PCIe rates); the report's prediction runs on it"),
    "d_profile.yaml": ("gpu_profile_{card}.yaml", "the GPU machine's compute and host-device copy models as a "
                       "training-sim hardware profile (--profile)"),
    "e_record.json": ("gpu_check_record.json", "the whole run's record: stages and their exit statuses, GPU tests, "
                      "versions, medians and ratios"),
    "b_pytest.xml": ("gpu_check_pytest.xml", "`pytest -m gpu` on the GPU machine (JUnit XML)"),
    "a_device.json": ("gpu_check_device.json", "device, driver, torch and CUDA versions, pinned and pageable "
                      "host-to-device bandwidth"),
}
ROW = re.compile(r"^\| `([^`]+)` \|")


def main(argv: list[str] | None = None) -> int:
    from impl.common import cli

    p = cli.ArgumentParser(prog="commit_gpu_evidence", description=cli.describe(__doc__))
    p.add_argument("--from", dest="src", required=True, help="the folder the run's files came back to")
    p.add_argument("--card", required=True, help="a short name of the GPU, e.g. h100 (lower case, digits, -)")
    p.add_argument("--to", default=str(REPO / "figures" / "reference"), help="the reference folder")
    p.add_argument("--allow-dry-run", action="store_true", help="accept a rehearsal's files (tier emu)")
    args = p.parse_args(argv)
    try:
        return commit(Path(args.src), args.card, Path(args.to), args.allow_dry_run)
    except (OSError, ValueError) as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2


def commit(src: Path, card: str, dest: Path, allow_dry_run: bool = False) -> int:
    from impl.common.records import read_record, write_record

    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,31}", card):
        raise ValueError(f"--card={card!r} is not allowed; expected lower-case letters, digits and '-', e.g. h100")
    if not src.is_dir():
        raise ValueError(f"--from {src}: not a folder; expected the one the run's files came back to")
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"--to {dest}: not a folder")
    missing = [name for name in FILES if not (src / name).is_file()]
    if missing:
        raise ValueError(f"--from {src}: missing {', '.join(missing)}; expected every file gpu_check.sh writes")
    try:
        runs = {name: read_record(src / name) for name in ("e_record.json", "c_bench.json")}
    except ValueError as e:
        raise ValueError(f"--from {e}; expected the run records gpu_check.sh writes") from None
    record, bench = runs["e_record.json"], runs["c_bench.json"]
    for name, r in runs.items():
        if r.get("tier") != "cluster" and not allow_dry_run:
            raise ValueError(f"--from {src / name}: tier {r.get('tier')!r}, not 'cluster': a run without a GPU "
                             "(--allow-dry-run to accept it)")
    device = bench.get("topology", {}).get("device") or record.get("topology", {}).get("device", "?")
    sha = (record.get("git", {}).get("sha") or "?")[:12]
    command = record.get("command")
    command = shlex.join(command) if isinstance(command, list) else str(command)
    targets = {name: target.format(card=card) for name, (target, _) in FILES.items()}
    records = {name: _renamed_outputs(src, name, r, targets) for name, r in runs.items()}
    dest.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name, (_, what) in FILES.items():
        target = targets[name]
        if name in records:
            write_record(dest / target, records[name])
        else:
            shutil.copyfile(src / name, dest / target)
        rows[target] = (f"| `{target}` | {what} | {record.get('tier')} ({device}; {record.get('timestamp', '?')[:10]}, "
                        f"commit {sha}) | `{command}`, then `python workflows/scripts/commit_gpu_evidence.py "
                        f"--card {card}` |")
    readme = dest / "README.md"
    lines = readme.read_text().splitlines() if readme.is_file() else [
        "# Committed reference results", "", "| file | what | tier | produced by |", "| --- | --- | --- | --- |"]
    kept = [line for line in lines if not ((m := ROW.match(line)) and m.group(1) in rows)]
    readme.write_text("\n".join(kept + list(rows.values())) + "\n")
    print(f"{len(rows)} files from {src} ({device}) -> {dest}; README rows written; review and commit them")
    return 0


def _renamed_outputs(src: Path, name: str, record: dict, targets: dict[str, str]) -> dict:
    """`record` with its `outputs` entries under the names the files are committed under, so the
    readers' check of a CSV against its record still applies there; each file is first checked
    against its entry (a file cut short or changed on the way back is refused, not committed)."""
    from impl.common.records import describe_output

    outputs = {}
    for out, expected in record.get("outputs", {}).items():
        if out not in targets:
            raise ValueError(f"--from {src / name}: describes {out!r}, a file gpu_check.sh does not bring back")
        found = describe_output(src / out, expected["rows"])
        if found["sha256"] != expected["sha256"]:
            raise ValueError(f"--from {src / out}: not the file the run wrote (sha256 differs from {name}'s); "
                             "fetch the run's files again")
        outputs[targets[out]] = expected
    return {**record, "outputs": outputs} if "outputs" in record else record


if __name__ == "__main__":
    sys.exit(main())
