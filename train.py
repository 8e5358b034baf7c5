"""Train one mlplab experiment: python train.py [key=value ...] (see conf/)."""

import sys

# A single run starts its tracking writer first thing, so that MLflow's import runs
# beside Hydra's start-up (~0.3 s sooner done). Not for a multirun, whose trials may
# run elsewhere (a launcher's workers), nor for Hydra's informational flags.
NO_RUN = {"-m", "--multirun", "-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info",
          "-sc", "--shell-completion", "tracking.enabled=false"}
if __name__ == "__main__" and not NO_RUN & set(sys.argv[1:]):
    from mlplab import writer

    writer.start()

from mlplab.app import main  # noqa: E402

if __name__ == "__main__":
    main()
