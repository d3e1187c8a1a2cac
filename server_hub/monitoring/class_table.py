"""The status page's per-class section: accuracy per class and the confusion matrix of the
last evaluation (server_hub/run/evaluation.py class_report), as plain HTML tables."""

from __future__ import annotations

from html import escape

MAX_MATRIX = 30  # classes beyond this get the per-class table only (the matrix is in JSON)


def class_tables(report: dict | None) -> str:
    if not report:
        return ""
    classes = [escape(c) for c in report["classes"]]
    accs = report["per_class_accuracy"]
    cm = report["confusion"]
    rows = "".join(
        f"<tr><td>{c}</td><td>{'-' if a is None else f'{a:.3f}'}</td><td>{sum(r)}</td></tr>"
        for c, a, r in zip(classes, accs, cm))
    out = ("<h2>Accuracy per class (last evaluation, all devices)</h2><table><tr>"
           f"<th>class</th><th>accuracy</th><th>test images x devices</th></tr>{rows}</table>")
    if len(classes) > MAX_MATRIX:
        return out + f"<p>{len(classes)} classes: the confusion matrix is in status.json</p>"
    head = "".join(f"<th>{c}</th>" for c in classes)
    body = "".join(
        f"<tr><th>{c}</th>" + "".join(
            f"<td{' style=font-weight:bold' if i == j else ''}>{v}</td>"
            for j, v in enumerate(r)) + "</tr>"
        for i, (c, r) in enumerate(zip(classes, cm)))
    return (out + "<h2>Confusion matrix (rows: true class, columns: predicted)</h2>"
            f"<table><tr><th></th>{head}</tr>{body}</table>")
