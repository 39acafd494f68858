"""Mail templates, shipped inside the package as retracer.email_templates."""
