"""The command line: parses flags, calls the library, prints."""
