"""Train one mlplab experiment: python train.py [key=value ...] (see conf/)."""

import sys

# Start the tracking writer first thing, so that MLflow's import runs beside Hydra's
# start-up. Not for Hydra's informational flags, untracked runs, or a multirun whose
# trials run in a launcher's workers (each starts its own).
NO_RUN = {"-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info", "-sc",
          "--shell-completion", "tracking.enabled=false"}
ELSEWHERE = ("hydra/launcher=", "+hydra/launcher=")
if __name__ == "__main__" and not NO_RUN & set(sys.argv[1:]) and not any(
        arg.startswith(ELSEWHERE) for arg in sys.argv[1:]):
    from mlplab import writer

    writer.start()

from mlplab.app import main  # noqa: E402

if __name__ == "__main__":
    main()
