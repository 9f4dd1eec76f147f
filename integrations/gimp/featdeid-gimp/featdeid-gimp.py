#!/usr/bin/env python3
# -*- coding: utf-8 -*-
"""GIMP 3 plug-in: Filters > Enhance > De-identify faces (featdeid).

GIMP's Python has no torch, so the plug-in runs the ``featdeid`` command: it exports the visible
image to a temporary PNG, runs

    featdeid IN.png -o OUT_DIR --format png --lossless --overwrite --quiet --report REPORT.json
             [--strength S] [--seed N] [--model M]

and loads ``OUT_DIR/IN.png`` as a new layer on top ("featdeid: N faces de-identified").

Settings: ``FEATDEID_COMMAND`` (path of the ``featdeid`` executable, default: found on PATH or in
~/.local/bin), ``FEATDEID_MODEL`` (model folder or Hub repo id; also a field in the dialog).
Install: copy the ``featdeid-gimp`` folder into GIMP's ``plug-ins`` folder and make the file
executable (see integrations/gimp/README.md).

Everything above ``_main`` is plain Python (no ``gi``), so it can be tested outside GIMP.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

PROC_NAME = "plug-in-featdeid"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def featdeid_command():
    """The ``featdeid`` executable: ``FEATDEID_COMMAND``, else PATH, else ~/.local/bin/featdeid."""
    cmd = os.environ.get("FEATDEID_COMMAND")
    if cmd:
        return cmd
    found = shutil.which("featdeid")
    if found:
        return found
    local = os.path.expanduser(os.path.join("~", ".local", "bin", "featdeid"))
    if os.path.isfile(local):
        return local
    raise RuntimeError("the featdeid command was not found: install featdeid (pip install 'featdeid[dlib]') "
                       "and put it on PATH, or set FEATDEID_COMMAND to its full path")


def build_command(src, out_dir, report, strength=None, seed=None, model=None, command=None):
    """The exact command line (a list) the plug-in runs for one exported PNG."""
    cmd = [command or featdeid_command(), src, "-o", out_dir, "--format", "png", "--lossless",
           "--overwrite", "--quiet", "--report", report]
    if strength is not None:
        cmd += ["--strength", repr(float(strength))]
    if seed is not None and int(seed) >= 0:
        cmd += ["--seed", str(int(seed))]
    model = model if model else os.environ.get("FEATDEID_MODEL")
    if model:
        cmd += ["--model", model]
    return cmd


def output_path(src, out_dir):
    """Where ``featdeid`` writes the result of ``src``: OUT_DIR / <name of src>.png."""
    return os.path.join(out_dir, os.path.splitext(os.path.basename(src))[0] + ".png")


def run_featdeid(src, work_dir, strength=None, seed=None, model=None, command=None):
    """Run the command on ``src``; return ``(output PNG, record of the file from the report)``.

    Raises RuntimeError with featdeid's message when the command fails (exit code 1 or 2).
    """
    out_dir = os.path.join(work_dir, "out")
    report = os.path.join(work_dir, "report.json")
    cmd = build_command(src, out_dir, report, strength, seed, model, command)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    record = {}
    if os.path.isfile(report):
        with open(report, encoding="utf-8") as f:
            files = json.load(f).get("files", [])
        record = files[0] if files else {}
    if proc.returncode != EXIT_OK:
        why = record.get("error") or proc.stderr.strip() or "exit code %d" % proc.returncode
        raise RuntimeError("featdeid failed: %s" % why)
    out = output_path(src, out_dir)
    if not os.path.isfile(out):
        raise RuntimeError("featdeid did not write %s" % out)
    return out, record


def layer_name(record):
    n = int(record.get("changed", 0))
    skipped = int(record.get("skipped", 0))
    name = "featdeid: %d face%s de-identified" % (n, "" if n == 1 else "s")
    if skipped:
        name += ", %d too small (unchanged)" % skipped
    return name


def _main():
    import gi

    gi.require_version("Gimp", "3.0")
    gi.require_version("GimpUi", "3.0")
    from gi.repository import Gimp, GimpUi, Gio, GLib, GObject

    class FeatdeidPlugIn(Gimp.PlugIn):
        def do_query_procedures(self):
            return [PROC_NAME]

        def do_set_i18n(self, name):
            return False

        def do_create_procedure(self, name):
            procedure = Gimp.ImageProcedure.new(self, name, Gimp.PDBProcType.PLUGIN, self.run, None)
            procedure.set_image_types("*")
            procedure.set_sensitivity_mask(Gimp.ProcedureSensitivityMask.DRAWABLE
                                           | Gimp.ProcedureSensitivityMask.DRAWABLES
                                           | Gimp.ProcedureSensitivityMask.NO_DRAWABLES)
            procedure.set_menu_label("De-identify faces (featdeid)...")
            procedure.add_menu_path("<Image>/Filters/Enhance/")
            procedure.set_documentation(
                "De-identify every face",
                "Adds a layer where every face carries the identity of a person who does not exist: it looks "
                "the same to people, face recognition no longer matches. Runs the featdeid command.",
                name)
            procedure.set_attribution("featdeid", "featdeid", "2024")
            procedure.add_double_argument("strength", "_Strength", "0 = unchanged, 1 = the model's output",
                                          0.0, 3.0, 1.0, GObject.ParamFlags.READWRITE)
            procedure.add_int_argument("seed", "S_eed", "Fake identities; -1 = derived from the image",
                                       -1, 2147483647, -1, GObject.ParamFlags.READWRITE)
            procedure.add_string_argument("model", "_Model", "Model folder or Hub repo id (empty: FEATDEID_MODEL "
                                          "or the default model)", os.environ.get("FEATDEID_MODEL", ""),
                                          GObject.ParamFlags.READWRITE)
            return procedure

        def run(self, procedure, run_mode, image, drawables, config, run_data):
            if run_mode == Gimp.RunMode.INTERACTIVE:
                GimpUi.init(PROC_NAME)
                dialog = GimpUi.ProcedureDialog.new(procedure, config, "De-identify faces (featdeid)")
                dialog.fill(None)
                ok = dialog.run()
                dialog.destroy()
                if not ok:
                    return procedure.new_return_values(Gimp.PDBStatusType.CANCEL, GLib.Error())
            strength = config.get_property("strength")
            seed = config.get_property("seed")
            model = config.get_property("model")
            Gimp.progress_init("De-identifying faces (featdeid)...")
            with tempfile.TemporaryDirectory(prefix="featdeid-gimp-") as work:
                src = os.path.join(work, "featdeid-input.png")
                flat = image.duplicate()
                try:
                    flat.merge_visible_layers(Gimp.MergeType.CLIP_TO_IMAGE)
                    if not Gimp.file_save(Gimp.RunMode.NONINTERACTIVE, flat, Gio.File.new_for_path(src), None):
                        raise RuntimeError("GIMP could not export the image to %s" % src)
                finally:
                    flat.delete()
                try:
                    out, record = run_featdeid(src, work, strength, seed, model)
                except RuntimeError as e:
                    return procedure.new_return_values(Gimp.PDBStatusType.EXECUTION_ERROR,
                                                       GLib.Error.new_literal(GLib.quark_from_string("featdeid"), str(e), 0))
                if int(record.get("faces", 0)) == 0:
                    Gimp.message("featdeid found no faces in this image: nothing was changed.")
                    return procedure.new_return_values(Gimp.PDBStatusType.SUCCESS, GLib.Error())
                image.undo_group_start()
                try:
                    layer = Gimp.file_load_layer(Gimp.RunMode.NONINTERACTIVE, image, Gio.File.new_for_path(out))
                    layer.set_name(layer_name(record))
                    image.insert_layer(layer, None, 0)
                    layer.set_offsets(0, 0)
                finally:
                    image.undo_group_end()
            if int(record.get("skipped", 0)):
                Gimp.message("featdeid: %d face(s) were too small and are NOT protected." % int(record["skipped"]))
            Gimp.displays_flush()
            return procedure.new_return_values(Gimp.PDBStatusType.SUCCESS, GLib.Error())

    Gimp.main(FeatdeidPlugIn.__gtype__, sys.argv)


if __name__ == "__main__":
    _main()
