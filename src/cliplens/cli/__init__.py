"""The `cliplens` command: parse input, call the library, format output."""
