"""Training of the featdeid hiding network (Hanawa, Ito & Aoki, EURASIP JIVP 2024, section 3.2 and 4.2)."""
