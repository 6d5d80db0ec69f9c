"""The math, with no I/O: the trainer, its configuration, optimizers, vocabulary and memory
budget; ``rnn/`` (the seed's tanh RNN) and ``cells/`` (gated and stacked cells). Imports only
itself and numpy."""
