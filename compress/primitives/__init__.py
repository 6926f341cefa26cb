"""Pure tensor math shared by the methods: no modules, no files."""
