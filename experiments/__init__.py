"""Live experiments: measurements that a training choice rests on, kept runnable to check it again on new hardware
(`python -m experiments.<name>`). Finished and dead-end experiments are in docs/experiments.md, with the commit that
holds their code."""
