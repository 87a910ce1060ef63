"""One module per method for the step benchmark: `CASES` (tier -> its cases) and `floor(bench, heads)`, optionally
`parts(bench)` for method-specific timings. Adding a method adds a file here; `step_throughput.py` stays as it is."""
