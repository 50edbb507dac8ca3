"""The stage kit: the contract every stage uses (store, run, executor, seeds, reasons, ...); it imports nothing else of ours."""
