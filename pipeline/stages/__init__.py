"""The DVC stages (dvc.yaml): a thin `main()` each over the library modules, never importing one another."""
