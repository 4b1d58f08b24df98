"""Train, evaluate, export and serve small image classifiers (MNIST, Fashion-MNIST)."""
