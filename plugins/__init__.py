"""Built-in plugins, registered through the ``medicon_gateway`` entry-point group like any third-party plugin."""
