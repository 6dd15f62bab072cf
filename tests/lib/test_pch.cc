// The object the shared test header is precompiled for (tests/lib/test_pch.h).
