"""Run a recipe with every training micro-step slowed down, so a test can send it a signal in the middle of training:

    python tests/scripts/slow_steps.py SECONDS recipes/clm.py --output_dir ... [recipe flags]

Only the wall-clock time changes (a sleep before each `Trainer.training_step`); the recipe, its signal handling,
checkpointing and numbers are the real ones. Used by tests/test_recipe_resume.py.
"""

import os
import runpy
import sys
import time

from transformers import Trainer

seconds, script = float(sys.argv[1]), sys.argv[2]
original = Trainer.training_step


def training_step(self, *args, **kwargs):
    time.sleep(seconds)
    return original(self, *args, **kwargs)


Trainer.training_step = training_step
sys.argv = [script, *sys.argv[3:]]
sys.path[0] = os.path.dirname(os.path.abspath(script))  # what `python script` puts first (recipes import common)
runpy.run_path(script, run_name="__main__")
