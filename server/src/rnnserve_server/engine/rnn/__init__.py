"""The seed's one-layer tanh RNN: the fast kernels, the plain reference, scoring and sampling."""
