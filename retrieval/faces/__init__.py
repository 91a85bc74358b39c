"""Faces: detection and alignment, dlib's face network (ported), search by face."""
