"""Operations endpoints that look across the feature apps (/healthz, /readyz): they stand above
the features, so that ``tuneplex.core`` stays the bottom floor that every app may import."""
