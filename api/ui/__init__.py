"""The dashboard's templates, static files and chart layout (served by ``api.routes.ui``)."""
