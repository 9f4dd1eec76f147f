--[[
  featdeid.lua: a darktable export target ("storage") that de-identifies every face.

  darktable exports each selected image (in the format chosen in the export module: PNG or TIFF
  keep it lossless), then this script runs the featdeid command on it:

    featdeid EXPORTED -o OUT_DIR --format png --lossless --overwrite --quiet [--strength S] [--model M]

  and removes the temporary export. The result is OUT_DIR/<exported name>.png, where OUT_DIR is
  the folder set in preferences (lua options), or "featdeid" inside the image's film roll folder.
  Exit code 0: done; 1: the file failed (e.g. unreadable); 2: usage error (e.g. no model).

  Install: copy to ~/.config/darktable/lua/contrib/featdeid.lua and add `require "contrib/featdeid"`
  to ~/.config/darktable/luarc (or enable it in the script manager). Preferences: the featdeid
  command (default: `featdeid` on PATH), the model (default: $FEATDEID_MODEL or the packaged model),
  the strength and the output folder.
]]

local dt = require "darktable"

local M = {}
local SCRIPT = "featdeid"

local function is_windows()
  return dt.configuration and dt.configuration.running_os == "windows"
end

function M.quote(s)
  s = tostring(s)
  if is_windows() then
    return '"' .. (s:gsub('"', '\\"')) .. '"'
  end
  return "'" .. (s:gsub("'", "'\\''")) .. "'"
end

local SEP = package.config:sub(1, 1)

function M.basename(path)
  return (path:match("([^/\\]+)$") or path)
end

function M.stem(path)
  local base = M.basename(path)
  return (base:gsub("%.[^.]+$", ""))
end

-- where the featdeid command writes the result of `input`
function M.output_path(input, out_dir)
  return out_dir .. SEP .. M.stem(input) .. ".png"
end

-- the exact command line run for one exported file
function M.command(featdeid, input, out_dir, strength, model)
  local parts = { M.quote(featdeid), M.quote(input), "-o", M.quote(out_dir),
                  "--format", "png", "--lossless", "--overwrite", "--quiet" }
  if strength then
    parts[#parts + 1] = "--strength"
    parts[#parts + 1] = string.format("%.3f", strength)
  end
  if model and model ~= "" then
    parts[#parts + 1] = "--model"
    parts[#parts + 1] = M.quote(model)
  end
  return table.concat(parts, " ")
end

local function pref(name, kind, default)
  local ok, value = pcall(dt.preferences.read, SCRIPT, name, kind)
  if not ok or value == nil or value == "" then
    return default
  end
  return value
end

local function settings()
  return {
    command = pref("command", "string", "featdeid"),
    model = pref("model", "string", os.getenv("FEATDEID_MODEL") or ""),
    strength = pref("strength", "float", 1.0),
    out_dir = pref("output_dir", "directory", ""),
  }
end

local function execute(cmd)
  if dt.control and dt.control.execute then
    return dt.control.execute(cmd)
  end
  local ok, _, code = os.execute(cmd)
  return ok and 0 or (code or 1)
end

local done, failed = 0, 0

function M.store(storage, image, format, filename, number, total, high_quality, extra_data)
  local s = settings()
  local out_dir = s.out_dir ~= "" and s.out_dir or (image.path .. SEP .. "featdeid")
  local code = execute(M.command(s.command, filename, out_dir, s.strength, s.model))
  os.remove(filename)
  if code == 0 then
    done = done + 1
    dt.print(string.format("featdeid %d/%d: %s", number, total, M.output_path(filename, out_dir)))
  else
    failed = failed + 1
    dt.print(string.format("featdeid failed on %s (exit code %s)", image.filename or filename, tostring(code)))
  end
  return code
end

function M.finalize(storage, image_table, extra_data)
  dt.print(string.format("featdeid: %d image(s) de-identified, %d failed", done, failed))
  done, failed = 0, 0
end

function M.supported(storage, format)
  local ext = string.lower(format.extension or "")
  return ext == "png" or ext == "tif" or ext == "tiff" or ext == "jpg" or ext == "webp"
end

dt.preferences.register(SCRIPT, "command", "string", "featdeid: command",
  "path of the featdeid executable", "featdeid")
dt.preferences.register(SCRIPT, "model", "string", "featdeid: model",
  "model folder or Hugging Face repo id (empty: FEATDEID_MODEL or the packaged model)", "")
dt.preferences.register(SCRIPT, "strength", "float", "featdeid: strength",
  "0 = unchanged, 1 = the model's output", 1.0, 0.0, 3.0, 0.05)
dt.preferences.register(SCRIPT, "output_dir", "directory", "featdeid: output folder",
  "empty: a featdeid folder inside each image's film roll folder", "")

dt.register_storage("featdeid", "de-identify faces (featdeid)", M.store, M.finalize, M.supported)

return M
