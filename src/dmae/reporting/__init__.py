"""What certification logs and training runs mean: tables, paired comparisons, curves, the HTML report and the
reconstruction figure."""
