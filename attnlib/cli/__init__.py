"""Console entry points: ``attnlib-info`` (capability matrix); training/benchmark apps join here."""
