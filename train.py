"""Train one mlplab experiment: python train.py [key=value ...] (see conf/)."""

from mlplab.commands.train import main

if __name__ == "__main__":
    main()
