"""The served models: loading a version (engine, warm-up, batcher), the golden check, the
router (the one owner of model and version state), the repository sync controller that
decides what serves, model control, and each version's accounting."""
