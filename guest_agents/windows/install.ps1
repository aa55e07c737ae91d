<#
.SYNOPSIS
  Install the microvm-sandbox guest agent as a Windows service (NOT RUN in this project's CI:
  no Windows guest can be booted there; see docs/images.md).

.DESCRIPTION
  Copies agent_core.py, platform_windows.py, sandbox_agent.py and windows_service.py to -InstallDir, installs
  pywin32 for the service host if it is missing (from -Wheelhouse when given, for offline
  images), registers the service "SandboxAgent" (automatic start, restart on failure) and
  starts it. The agent talks to the host over the virtio-serial port
  \\.\Global\org.microvm_sandbox.agent.0, which needs the vioser driver from the virtio-win ISO.
  Idempotent: running it again replaces the files and restarts the service.

.EXAMPLE
  powershell -ExecutionPolicy Bypass -File E:\install.ps1 -Python "C:\Program Files\Python312\python.exe"
#>
param(
    [string]$Python = "",
    [string]$InstallDir = "$env:ProgramFiles\SandboxAgent",
    [string]$Wheelhouse = "",
    [switch]$Uninstall
)
$ErrorActionPreference = "Stop"
$ServiceName = "SandboxAgent"

if (-not ([Security.Principal.WindowsPrincipal][Security.Principal.WindowsIdentity]::GetCurrent()).IsInRole(
        [Security.Principal.WindowsBuiltInRole]::Administrator)) {
    throw "Run install.ps1 as Administrator."
}

if ($Uninstall) {
    if (Get-Service $ServiceName -ErrorAction SilentlyContinue) {
        Stop-Service $ServiceName -Force -ErrorAction SilentlyContinue
        & sc.exe delete $ServiceName | Out-Null
    }
    Remove-Item -Recurse -Force $InstallDir -ErrorAction SilentlyContinue
    Write-Host "SandboxAgent removed."
    return
}

if (-not $Python) {
    $found = Get-Command python.exe -ErrorAction SilentlyContinue
    if (-not $found) { throw "Python 3.8+ not found: install it for all users, or pass -Python." }
    $Python = $found.Source
}
& $Python -c "import sys; sys.exit(sys.version_info < (3, 8))"
if ($LASTEXITCODE -ne 0) { throw "$Python is older than 3.8." }

if (-not (Test-Path "\\.\Global\org.microvm_sandbox.agent.0")) {
    Write-Warning "The agent's virtio-serial port is not there yet: install the vioser driver from the virtio-win ISO."
}

# pywin32 hosts the service (pythonservice.exe); offline images install it from a wheelhouse.
& $Python -c "import win32serviceutil" 2>$null
if ($LASTEXITCODE -ne 0) {
    if ($Wheelhouse) {
        & $Python -m pip install --no-index --find-links $Wheelhouse pywin32
    } else {
        & $Python -m pip install pywin32
    }
    if ($LASTEXITCODE -ne 0) { throw "pip install pywin32 failed." }
    & $Python -m pywin32_postinstall -install | Out-Null
}

New-Item -ItemType Directory -Force -Path $InstallDir | Out-Null
foreach ($name in "agent_core.py", "platform_windows.py", "sandbox_agent.py", "windows_service.py") {
    Copy-Item -Force (Join-Path $PSScriptRoot $name) (Join-Path $InstallDir $name)
}
# Only SYSTEM and Administrators may change the agent: it runs commands as LocalSystem.
& icacls.exe $InstallDir /inheritance:r /grant:r "SYSTEM:(OI)(CI)F" "Administrators:(OI)(CI)F" | Out-Null

$agent = Join-Path $InstallDir "sandbox_agent.py"
if (Get-Service $ServiceName -ErrorAction SilentlyContinue) {
    Stop-Service $ServiceName -Force -ErrorAction SilentlyContinue
    & $Python $agent service --startup auto update
} else {
    & $Python $agent service --startup auto install
}
if ($LASTEXITCODE -ne 0) { throw "registering the service failed." }
# Restart 1 s after a crash, forever (the Linux agent's respawn).
& sc.exe failure $ServiceName reset= 0 actions= restart/1000/restart/1000/restart/1000 | Out-Null
Start-Service $ServiceName
Write-Host "SandboxAgent installed in $InstallDir and started."
