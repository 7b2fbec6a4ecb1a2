"""The core: the record service and the record model, with no HTTP in it (see ARCHITECTURE.md)."""
