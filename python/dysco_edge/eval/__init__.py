"""The evaluation: seeded long-context tasks, decoding methods, the runner, scoring, statistics,
reports and plots, and the `eval` / `eval-report` verbs."""
