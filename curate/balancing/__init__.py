"""MetaCLIP-style metadata, caption matching, entry counting and balanced sampling."""
