"""The zoo tier's coverage table: each zoo test records its model's row as a user property
("zoo_row", which also reaches a controlling process, e.g. under pytest-xdist); the table is
printed at the end of the run, in the zoo's order, and written to
$TRITONBN_ZOO_TABLE when set."""
import os

_ROWS: list = []


def pytest_runtest_logreport(report):
    if report.when == "call":
        _ROWS.extend(value for key, value in report.user_properties if key == "zoo_row")


def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    from tests.transforms.zoo import ZOO
    order = [z.id for z in ZOO]
    rows = sorted(_ROWS, key=lambda r: order.index(r["model"]))
    head = ("| model | batch-norm-like layers | on tritonbn's kernels after convert_model | "
            "fused by fuse | folded by fold_into_conv | input | seconds (CPU seconds) |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['layers']} | {r['kernels']} | {r['fused']} | "
                     f"{r['folded']} | {r['input']} | {r['seconds']:.0f} "
                     f"({r['cpu_seconds']:.0f}) |")
    total, cpu = sum(r["seconds"] for r in rows), sum(r["cpu_seconds"] for r in rows)
    lines.append(f"\n{len(rows)} models, {sum(r['layers'] for r in rows)} layers, "
                 f"{total:.0f} s ({cpu:.0f} CPU seconds) in the zoo tests")
    text = "\n".join(lines)
    terminalreporter.write_sep("-", "model zoo coverage")
    terminalreporter.write_line(text)
    path = os.environ.get("TRITONBN_ZOO_TABLE")
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
