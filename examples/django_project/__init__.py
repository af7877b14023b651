"""A minimal Django project with relaymw around its WSGI and ASGI applications."""
