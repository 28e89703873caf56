"""Evidence for examiners: what the mount has seen and fetched, in the formats their tools
read (hashdeep, Sleuth Kit bodyfile, DFXML, JSON lines), and the hash-chained audit log."""
