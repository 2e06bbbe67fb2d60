patchShebangs scripts tools
