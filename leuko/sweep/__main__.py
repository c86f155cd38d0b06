"""`python -m leuko.sweep TRIAL_DIR/trial.json`: the process of one isolated (e.g. DDP) trial."""

import sys

from leuko.sweep.trial import run_trial

if len(sys.argv) != 2:
    sys.exit("usage: python -m leuko.sweep TRIAL_DIR/trial.json (started by `leuko sweep`)")
sys.exit(run_trial(sys.argv[1]))
