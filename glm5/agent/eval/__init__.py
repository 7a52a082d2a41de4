"""The reliability harness behind `glm5 agent eval`: suites of tasks, verifiers, pass@k / pass^k, the
failure taxonomy and the report.

    glm5 agent eval --suite function-calling -k 4 --out runs/agent-eval --base-url http://127.0.0.1:8000

`tasks` loads and validates a suite (a folder of JSON task files plus data), `verify` checks a run's answer
and files, `metrics` holds the estimators and the failure classes, `harness` runs every task K times,
`report` writes results.json's companion report.md with plots.
"""
