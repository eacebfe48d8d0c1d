"""An example qcompiler plugin: one pass, registered through the entry point."""
