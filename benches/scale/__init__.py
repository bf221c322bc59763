"""Sections of benches/bench_scale.py: one module per part of issue 8, each with
`add_args(parser)` and `run(args) -> list[Row]`, a row being (measure, value, goal, note)."""
