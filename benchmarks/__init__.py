"""FAM's benchmark (`python -m benchmarks.bench`, from the repository root) and the WebUI
stand-ins it shares with the tests; not part of the `fam` package a user installs."""
