"""The SLIM pipeline as a library: `layout` names every artifact of a run, `runner` runs
fingerprinted stages over a workdir (experiments/run_slim.py)."""
