// Implemented by its owner; see the header.
