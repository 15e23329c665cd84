"""What a study shows a person: the report document, the verdict, tables (console and Markdown) and the status."""
