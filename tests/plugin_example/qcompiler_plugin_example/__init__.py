"""Example qcompiler plugins: a pass, an integer op and a target, registered through entry points."""
