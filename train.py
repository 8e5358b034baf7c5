"""Train one mlplab experiment: python train.py [key=value ...] (see conf/)."""

import re
import sys

# Start the tracking writer first thing, so that MLflow's import runs beside Hydra's
# start-up. Not for Hydra's informational flags, untracked runs, or a multirun whose
# trials run in a launcher's workers (each starts its own). Set in a config file
# instead, tracking.enabled=false stops it before training; a launcher leaves it idle.
NO_RUN = {"-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info", "-sc",
          "--shell-completion"}
ELSEWHERE = re.compile(r"^\+*(hydra/launcher=|tracking\.enabled=(false|False|0)$)")
if __name__ == "__main__" and not NO_RUN & set(sys.argv[1:]) and not any(
        ELSEWHERE.match(arg) for arg in sys.argv[1:]):
    from mlplab import writer

    writer.start()

from mlplab.app import main  # noqa: E402

if __name__ == "__main__":
    main()
