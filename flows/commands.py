"""Command-line surface of the orchestration package, as data (see flows/cli.py)."""

COMMANDS = [
    {
        "name": "serve",
        "summary": "serve every stage flow and end_to_end as deployments for the Prefect UI",
        "description": (
            "Registers one deployment per stage flow (demo-data, init-model, curate, caption, "
            "precompute, train, make-prefs, dpo, sample, ...) and end_to_end, all named FLOW/NAME, "
            "with the Prefect API configured in this shell (PREFECT_API_URL, or the active profile), "
            "and runs the flow runs people trigger from the UI until interrupted. Start a server "
            "first: `prefect server start --host 127.0.0.1`, then "
            "`PREFECT_API_URL=http://127.0.0.1:4200/api t2i serve`."
        ),
        "config": "flows.config:ServeConfig",
        "run": "flows.serve:run_serve",
    },
    {
        "name": "run-all",
        "summary": "run the end_to_end flow here (Prefect's ephemeral mode when no server is configured)",
        "description": (
            "Runs end_to_end in this process: demo data (or SOURCE) -> curate -> caption -> "
            "precompute -> train -> preference pairs -> DPO LoRA -> samples with and without the "
            "LoRA, each stage in a subfolder of WORKDIR; stages already finished there with the "
            "same inputs and parameters are skipped. Prints where each output is."
        ),
        "config": "flows.config:RunAllConfig",
        "run": "flows.serve:run_all",
        "positionals": [("workdir", "working directory; each stage writes a subfolder")],
    },
]
