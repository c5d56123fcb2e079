//! Command line and `-o` option parsing (placeholder, being written).
