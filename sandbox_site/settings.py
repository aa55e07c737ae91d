"""Settings, all from the environment (see docs/configuration.md).

With nothing set, the site runs on an embedded default that behaves like production: SQLite
(WAL, immediate write transactions, a busy timeout) and a private Redis on a Unix socket that
``make run`` starts (scripts/run.sh) for the channel layer, the cache and Celery's broker. With
DATABASE_URL (PostgreSQL) and REDIS_URL it runs the production setup.
"""

import ipaddress
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
_env_file = Path(env.str("SANDBOX_ENV_FILE", default=str(BASE_DIR / ".env")))
if _env_file.is_file():
    env.read_env(str(_env_file))

DEBUG = env.bool("DEBUG", default=False)
SECRET_KEY = env.str("SECRET_KEY", default="")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("SECRET_KEY must be set when DEBUG is off (make run writes one into .env).")
    SECRET_KEY = "insecure-development-key-only-used-with-debug-on"  # noqa: S105

ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])
# Websockets from a browser are accepted only from the dashboard's own scheme://host:port
# (exactly: another port of the same host is another origin) or from these origins.
SANDBOX_TRUSTED_ORIGINS = env.list("SANDBOX_TRUSTED_ORIGINS", default=[])

DATA_DIR = Path(env.str("SANDBOX_DATA_DIR", default=str(BASE_DIR / "var")))

INSTALLED_APPS = [
    "daphne",
    "accounts.admin_audit.SandboxAdminConfig",  # django.contrib.admin with audited changes
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "guardian",
    "channels",
    "accounts",
    "vms",
    "networking",
    "snapshots",
    "guest_agents",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "accounts.middleware.RequestContextMiddleware",
    "sandbox_site.metrics.ObservabilityMiddleware",
    "sandbox_site.api_io.ApiInputMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "sandbox_site.urls"
ASGI_APPLICATION = "sandbox_site.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{DATA_DIR / 'db.sqlite3'}")}
DATABASES["default"]["ATOMIC_REQUESTS"] = False
DATABASES["default"].setdefault("CONN_MAX_AGE", env.int("DB_CONN_MAX_AGE", default=0))
# The web process (sandbox_site/asgi.py turns it on) keeps PostgreSQL connections in a pool:
# under ASGI every request runs in a thread of its own, so without one each request paid a
# new connection (~14 ms here, docs/benchmarks.md). Bounded: at most DB_POOL_MAX_SIZE
# connections per process; a request waits at most DB_POOL_TIMEOUT seconds for one (then 500).
# Off in Celery workers (prefork: a pool must not cross fork()) and in manage.py commands.
DB_POOL = env.bool("DB_POOL", default=False) and DATABASES["default"]["ENGINE"].endswith("postgresql")
if DB_POOL:
    DATABASES["default"]["CONN_MAX_AGE"] = 0  # the pool keeps them instead (Django requires 0)
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": env.int("DB_POOL_MIN_SIZE", default=2),
        "max_size": env.int("DB_POOL_MAX_SIZE", default=20),
        "timeout": env.float("DB_POOL_TIMEOUT", default=10.0),
    }
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # Several processes write at once (web, Celery worker and beat). WAL lets readers go on
    # while one writes; BEGIN IMMEDIATE takes the write lock when a transaction starts, so
    # two transactions never both read and then fail to upgrade ("database is locked" at
    # once, whatever the timeout); a writer that finds the lock taken waits up to 20 s.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL",
        }
    )
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Without REDIS_URL: the private Redis that `make run` starts (scripts/run.sh) on this Unix
# socket, with no TCP port. Connections are opened on first use, so manage.py commands that
# need none of the channel layer, cache or broker (migrate, bootstrap_admin, build_image...)
# work while it is not running.
SANDBOX_REDIS_SOCKET = Path(env.str("SANDBOX_REDIS_SOCKET", default=str(DATA_DIR / "redis.sock")))
REDIS_URL = env.str("REDIS_URL", default="") or f"unix://{SANDBOX_REDIS_SOCKET.absolute()}"

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [REDIS_URL], "capacity": 200, "expiry": 30},
    }
}
# Celery (kombu) spells a Unix socket redis+socket:///path.
CELERY_BROKER_URL = REDIS_URL.replace("unix://", "redis+socket://", 1) if REDIS_URL.startswith("unix://") else REDIS_URL
CACHES = {
    "default": {
        # Django's Redis cache with one connection pool per process, not per request thread.
        "BACKEND": "sandbox_site.redis_cache.SharedPoolRedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "msbx",
        "TIMEOUT": 300,
        # A Redis that stops answering fails the request instead of stalling its thread.
        "OPTIONS": {"socket_connect_timeout": 5, "socket_timeout": 10},
    }
}
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=False)
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = "shared"
CELERY_BROKER_CONNECTION_TIMEOUT = 5
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
AUTHENTICATION_BACKENDS = [
    "accounts.backends.LockoutModelBackend",
    "guardian.backends.ObjectPermissionBackend",
]
PASSWORD_HASHERS = env.list(
    "PASSWORD_HASHERS",
    default=[
        "django.contrib.auth.hashers.PBKDF2PasswordHasher",
        "django.contrib.auth.hashers.PBKDF2SHA1PasswordHasher",
    ],
)
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard:home"
LOGOUT_REDIRECT_URL = "login"
GUARDIAN_RAISE_403 = False
ANONYMOUS_USER_NAME = None

# Failed logins (dashboard, admin and HTTP basic alike): THRESHOLD failures lock one
# (account, client address) pair for LOCKOUT_SECONDS; past ACCOUNT_CEILING failures from all
# addresses together, each attempt on the account waits a doubling delay (at most
# BACKOFF_MAX_SECONDS) instead of locking it. See docs/security.md.
SANDBOX_LOCKOUT_THRESHOLD = env.int("SANDBOX_LOCKOUT_THRESHOLD", default=5)
SANDBOX_LOCKOUT_SECONDS = env.int("SANDBOX_LOCKOUT_SECONDS", default=900)
SANDBOX_LOGIN_ACCOUNT_CEILING = env.int("SANDBOX_LOGIN_ACCOUNT_CEILING", default=50)
SANDBOX_LOGIN_BACKOFF_MAX_SECONDS = env.int("SANDBOX_LOGIN_BACKOFF_MAX_SECONDS", default=60)
SANDBOX_TOKEN_MAX_PER_USER = env.int("SANDBOX_TOKEN_MAX_PER_USER", default=50)

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"
STATICFILES_DIRS = [BASE_DIR / "static"]
# Serve straight from the app and static folders too, so a checkout works without collectstatic.
WHITENOISE_USE_FINDERS = True

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "accounts.authentication.BearerTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
        "rest_framework.authentication.BasicAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["accounts.authentication.TokenScopePermission"],
    "DEFAULT_PAGINATION_CLASS": "sandbox_site.pagination.ApiPagination",
    "DEFAULT_PARSER_CLASSES": [
        "sandbox_site.api_io.CheckedJSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_RENDERER_CLASSES": [
        "sandbox_site.api_io.SafeJSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
    "PAGE_SIZE": 50,
    "DEFAULT_THROTTLE_CLASSES": ["sandbox_site.throttling.ApiRateLimit"],
    "EXCEPTION_HANDLER": "sandbox_site.errors.api_exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_FILTER_BACKENDS": [],
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
# Largest ?limit= of a list endpoint.
SANDBOX_PAGE_MAX = env.int("SANDBOX_PAGE_MAX", default=500)
# Rate limits (sandbox_site/throttling.py, docs/security.md): "<requests>/<s|m|h|d>", empty = none.
SANDBOX_RATE_LIMITS = {
    "anon": env.str("SANDBOX_RATE_ANON", default="60/min"),
    "user": env.str("SANDBOX_RATE_USER", default="1200/min"),
    "create": env.str("SANDBOX_RATE_CREATE", default="30/min"),
    "exec": env.str("SANDBOX_RATE_EXEC", default="300/min"),
    "upload": env.str("SANDBOX_RATE_UPLOAD", default="60/min"),
    "snapshot": env.str("SANDBOX_RATE_SNAPSHOT", default="20/min"),
    "clone": env.str("SANDBOX_RATE_CLONE", default="10/min"),
}
SPECTACULAR_SETTINGS = {
    "TITLE": "microvm-sandbox API",
    "DESCRIPTION": "Manage microVMs: lifecycle, exec, files, snapshots, networking.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "ENUM_NAME_OVERRIDES": {
        "VmStateEnum": "vms.models.VmState",
        "SnapshotStateEnum": "snapshots.models.Snapshot.State",
        "UserRoleEnum": "accounts.models.Role",
        "ProjectRoleEnum": "accounts.models.ProjectRole",
    },
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "sandbox_site.api_schema.error_responses",
    ],
}

# HTTPS deployment: `manage.py check --deploy` is clean with SANDBOX_HTTPS=true.
SANDBOX_HTTPS = env.bool("SANDBOX_HTTPS", default=False)
SESSION_COOKIE_SECURE = SANDBOX_HTTPS
CSRF_COOKIE_SECURE = SANDBOX_HTTPS
SECURE_SSL_REDIRECT = SANDBOX_HTTPS and env.bool("SECURE_SSL_REDIRECT", default=True)
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=31536000 if SANDBOX_HTTPS else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = SANDBOX_HTTPS
SECURE_HSTS_PRELOAD = SANDBOX_HTTPS
SANDBOX_BEHIND_PROXY = env.bool("SANDBOX_BEHIND_PROXY", False)
# Daphne processes serving the web (scripts/web.py, used by scripts/run.sh and msbx-web.service):
# 0 = one per CPU but one, 1-4. They share one listening socket; websockets and caches live in Redis.
WEB_PROCESSES = env.int("WEB_PROCESSES", default=0)
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if SANDBOX_BEHIND_PROXY else None
# Client addresses for rate limits and login lockout: REMOTE_ADDR, or behind the proxy the
# address it appended to X-Forwarded-For (never one a client wrote there itself).
REST_FRAMEWORK["NUM_PROXIES"] = 1 if SANDBOX_BEHIND_PROXY else 0
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True

# Logs: JSON lines by default with DEBUG off (plain text with DEBUG on), each line with the ids of
# the request, user, VM, operation and Celery task being handled (sandbox_site/logs.py).
LOG_FORMAT = env.str("LOG_FORMAT", default="plain" if DEBUG else "json")
if LOG_FORMAT not in ("json", "plain"):
    raise ImproperlyConfigured(f"LOG_FORMAT must be json or plain, not {LOG_FORMAT!r}.")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"context": {"()": "vms.hostd.logcontext.LogContextFilter"}},
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s [%(ctx)s] %(message)s"},
        "json": {"()": "vms.hostd.logcontext.JsonFormatter"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT, "filters": ["context"]}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}
# Celery replaces the root logger's handlers in workers and beat unless told not to: keep ours.
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# Process logs written by scripts/run.sh (make run): size cap per file and rotated copies kept.
SANDBOX_LOG_MAX_BYTES = env.int("SANDBOX_LOG_MAX_BYTES", default=50 << 20)
SANDBOX_LOG_BACKUPS = env.int("SANDBOX_LOG_BACKUPS", default=5)

# --- monitoring (docs/operations.md) -----------------------------------------------------
# /metrics of the web process: with a token only with `Authorization: Bearer <token>`, else only
# from these networks. Workers and hostd serve theirs on SANDBOX_METRICS_BIND (0 = no listener).
SANDBOX_METRICS_TOKEN = env.str("SANDBOX_METRICS_TOKEN", default="")
SANDBOX_METRICS_NETWORKS = [
    ipaddress.ip_network(n.strip(), strict=False)
    for n in env.list("SANDBOX_METRICS_NETWORKS", default=["127.0.0.0/8", "::1/128"])
    if n.strip()
]
SANDBOX_METRICS_BIND = env.str("SANDBOX_METRICS_BIND", default="127.0.0.1")
SANDBOX_WORKER_METRICS_PORT = env.int("SANDBOX_WORKER_METRICS_PORT", default=9101)
SANDBOX_HOSTD_METRICS_PORT = env.int("SANDBOX_HOSTD_METRICS_PORT", default=9102)
# A host is down (its VMs `unknown`) when its worker's heartbeat, or its hostd's answer to it, is
# older than this; beat checks every host on the shared queue.
SANDBOX_HOST_DOWN_SECONDS = env.float("SANDBOX_HOST_DOWN_SECONDS", default=30.0)
# The queue whose workers relay files between hosts' hostds (moving VMs, vms.transfer): they
# need the control plane's client certificate (SANDBOX_PKI_DIR/control.crt), which hypervisor
# hosts do not hold: a queue only control-plane workers consume.
SANDBOX_TRANSFER_QUEUE = env.str("SANDBOX_TRANSFER_QUEUE", default="shared")
# /readyz: free space the data directory needs.
SANDBOX_READY_MIN_FREE_BYTES = env.int("SANDBOX_READY_MIN_FREE_BYTES", default=1 << 30)

# --- microVMs ---------------------------------------------------------------------------
SANDBOX_HYPERVISOR = env.str("SANDBOX_HYPERVISOR", default="auto")  # auto | cloud-hypervisor | qemu
SANDBOX_CLOUD_HYPERVISOR_BINARY = env.str("SANDBOX_CLOUD_HYPERVISOR_BINARY", default="cloud-hypervisor")
# QEMU acceleration: auto = KVM only where it really runs ordinary guests, else TCG.
SANDBOX_ACCEL = env.str("SANDBOX_ACCEL", default="auto").strip().lower()
if SANDBOX_ACCEL not in ("auto", "kvm", "tcg"):
    raise ImproperlyConfigured(f"SANDBOX_ACCEL must be auto, kvm or tcg, not {SANDBOX_ACCEL!r}.")
# VMM confinement (docs/security.md): the user every VMM runs as (empty = the caller, for
# development), the cgroup below which each VMM gets its own, and that cgroup's limits.
SANDBOX_VMM_USER = env.str("SANDBOX_VMM_USER", default="msbx-vmm")
SANDBOX_VMM_CGROUP = env.str("SANDBOX_VMM_CGROUP", default="microvm-sandbox")
SANDBOX_VMM_MEMORY_OVERHEAD_MIB = env.int("SANDBOX_VMM_MEMORY_OVERHEAD_MIB", default=256)
SANDBOX_VMM_PIDS_MAX = env.int("SANDBOX_VMM_PIDS_MAX", default=256)
SANDBOX_VMM_IO_WEIGHT = env.int("SANDBOX_VMM_IO_WEIGHT", default=100)
if SANDBOX_VMM_MEMORY_OVERHEAD_MIB < 0 or SANDBOX_VMM_PIDS_MAX < 16 or not 1 <= SANDBOX_VMM_IO_WEIGHT <= 10000:
    raise ImproperlyConfigured(
        "SANDBOX_VMM_MEMORY_OVERHEAD_MIB must be >= 0, SANDBOX_VMM_PIDS_MAX >= 16, SANDBOX_VMM_IO_WEIGHT 1..10000."
    )
SANDBOX_HOST_NAME = env.str("SANDBOX_HOST_NAME", default="local")
# Host admission (vms.admission, docs/security.md): a VM starts only if the vCPUs and memory
# (guest RAM + SANDBOX_VMM_MEMORY_OVERHEAD_MIB) of the VMs holding them on its host still fit into
# (CPUs - reserve) x CPU overcommit and (memory - reserve) x memory overcommit. Hosts may override each.
SANDBOX_CPU_OVERCOMMIT = env.float("SANDBOX_CPU_OVERCOMMIT", default=8.0)
SANDBOX_MEMORY_OVERCOMMIT = env.float("SANDBOX_MEMORY_OVERCOMMIT", default=1.0)
SANDBOX_HOST_RESERVE_MEMORY_MIB = env.int("SANDBOX_HOST_RESERVE_MEMORY_MIB", default=1024)
SANDBOX_HOST_RESERVE_CPUS = env.int("SANDBOX_HOST_RESERVE_CPUS", default=0)
if not (0.1 <= SANDBOX_CPU_OVERCOMMIT <= 64 and 0.1 <= SANDBOX_MEMORY_OVERCOMMIT <= 4):
    raise ImproperlyConfigured("SANDBOX_CPU_OVERCOMMIT must be 0.1..64 and SANDBOX_MEMORY_OVERCOMMIT 0.1..4.")
if SANDBOX_HOST_RESERVE_MEMORY_MIB < 0 or SANDBOX_HOST_RESERVE_CPUS < 0:
    raise ImproperlyConfigured("SANDBOX_HOST_RESERVE_MEMORY_MIB and SANDBOX_HOST_RESERVE_CPUS must be >= 0.")
SANDBOX_RUNTIME_DIR = Path(env.str("SANDBOX_RUNTIME_DIR", default=str(DATA_DIR / "run")))
SANDBOX_IMAGE_DIR = Path(env.str("SANDBOX_IMAGE_DIR", default=str(DATA_DIR / "images")))
# Images operators upload or register (vms.images): where their disks live, where registered
# ones are taken from, and the limits every one is checked against.
SANDBOX_IMAGE_STORE = Path(env.str("SANDBOX_IMAGE_STORE", default=str(DATA_DIR / "image-store")))
SANDBOX_IMAGE_IMPORT_DIR = Path(env.str("SANDBOX_IMAGE_IMPORT_DIR", default=str(DATA_DIR / "image-import")))
SANDBOX_IMAGE_MAX_UPLOAD_BYTES = env.int("SANDBOX_IMAGE_MAX_UPLOAD_BYTES", default=64 << 30)
SANDBOX_IMAGE_MAX_VIRTUAL_BYTES = env.int("SANDBOX_IMAGE_MAX_VIRTUAL_BYTES", default=256 << 30)
# Firmware boot: QEMU's OVMF (Debian's ovmf package), cloud-hypervisor's CLOUDHV.fd or
# rust-hypervisor-firmware (no Debian package: the operator installs it), and the virtio-win
# driver ISO attached to Windows guests as a CD-ROM (after the disk in boot order) when set.
SANDBOX_QEMU_OVMF_CODE = env.str("SANDBOX_QEMU_OVMF_CODE", default="/usr/share/OVMF/OVMF_CODE_4M.fd")
SANDBOX_QEMU_OVMF_VARS = env.str("SANDBOX_QEMU_OVMF_VARS", default="/usr/share/OVMF/OVMF_VARS_4M.fd")
SANDBOX_CLOUD_HYPERVISOR_FIRMWARE = env.str("SANDBOX_CLOUD_HYPERVISOR_FIRMWARE", default="")
SANDBOX_VIRTIO_WIN_ISO = env.str("SANDBOX_VIRTIO_WIN_ISO", default="")
SANDBOX_BOOT_TIMEOUT = env.float("SANDBOX_BOOT_TIMEOUT", default=120.0)
SANDBOX_STOP_TIMEOUT = env.float("SANDBOX_STOP_TIMEOUT", default=30.0)
# Live migration: the longest a VM's copy to another host may take (disk and RAM) before it is
# cancelled and the VM runs on where it was.
SANDBOX_MIGRATION_TIMEOUT = env.float("SANDBOX_MIGRATION_TIMEOUT", default=600.0)
SANDBOX_RECONCILE_SECONDS = env.float("SANDBOX_RECONCILE_SECONDS", default=5.0)
# How often a host's worker checks the image files it holds (vms.inventory; a file is hashed
# again only when its size or modification time changed).
SANDBOX_INVENTORY_SECONDS = env.float("SANDBOX_INVENTORY_SECONDS", default=30.0)
# A host waits at most this long for the control plane's copy of a golden snapshot before it
# builds its own (snapshots.golden).
SANDBOX_GOLDEN_COPY_TIMEOUT = env.float("SANDBOX_GOLDEN_COPY_TIMEOUT", default=3600.0)
# Fair scheduling: operations of one owner running at once (create, start, snapshot, clone...);
# the owner's further operations wait (re-queued after DEFER_SECONDS), other owners' proceed.
SANDBOX_OPERATIONS_PER_OWNER = env.int("SANDBOX_OPERATIONS_PER_OWNER", default=4)
SANDBOX_OPERATIONS_DEFER_SECONDS = env.float("SANDBOX_OPERATIONS_DEFER_SECONDS", default=2.0)
SANDBOX_DEFAULT_QUOTA = {
    "max_vms": env.int("SANDBOX_DEFAULT_MAX_VMS", default=10),
    "max_vcpus": env.int("SANDBOX_DEFAULT_MAX_VCPUS", default=8),
    "max_memory_mib": env.int("SANDBOX_DEFAULT_MAX_MEMORY_MIB", default=8192),
    "max_disk_gib": env.int("SANDBOX_DEFAULT_MAX_DISK_GIB", default=100),
}
# Shared limits of a team project without a quota row (a personal project has its user's).
SANDBOX_DEFAULT_PROJECT_QUOTA = {
    "max_vms": env.int("SANDBOX_DEFAULT_PROJECT_MAX_VMS", default=20),
    "max_vcpus": env.int("SANDBOX_DEFAULT_PROJECT_MAX_VCPUS", default=16),
    "max_memory_mib": env.int("SANDBOX_DEFAULT_PROJECT_MAX_MEMORY_MIB", default=16384),
    "max_disk_gib": env.int("SANDBOX_DEFAULT_PROJECT_MAX_DISK_GIB", default=200),
}
# Consoles: scrollback replayed to a new viewer, unacknowledged bytes in flight per viewer.
SANDBOX_CONSOLE_SCROLLBACK_BYTES = env.int("SANDBOX_CONSOLE_SCROLLBACK_BYTES", default=256 * 1024)
SANDBOX_CONSOLE_WINDOW_BYTES = env.int("SANDBOX_CONSOLE_WINDOW_BYTES", default=2 << 20)
SANDBOX_CONSOLE_TICKET_SECONDS = env.int("SANDBOX_CONSOLE_TICKET_SECONDS", default=60)
# Open console/exec/events websockets re-check their rights this often (and at once when a
# service changes rights): a revoked token, removed share or deactivated user closes them.
SANDBOX_WS_RECHECK_SECONDS = env.float("SANDBOX_WS_RECHECK_SECONDS", default=10.0)
# Open websockets (console, exec, events) per user and web process; more are refused (4429).
SANDBOX_WS_PER_USER = env.int("SANDBOX_WS_PER_USER", default=100)
SANDBOX_SAMPLE_SECONDS = env.float("SANDBOX_SAMPLE_SECONDS", default=10.0)
SANDBOX_SAMPLE_RETENTION_SECONDS = env.int("SANDBOX_SAMPLE_RETENTION_SECONDS", default=6 * 3600)


def _on_every_host(task: str, seconds: float) -> dict:
    """A beat entry for per-host periodic work: the installation's one beat puts a fan-out on
    the shared queue, which sends ``task`` to every live host's queue (``vms.hosts.
    host_periodic_fanout``); each message expires after two periods."""
    return {
        "task": "vms.tasks.host_periodic_fanout_task",
        "schedule": seconds,
        "args": [task, seconds * 2],
        "options": {"queue": "shared", "expires": seconds},
    }


CELERY_BEAT_SCHEDULE = {
    "vms-sample": _on_every_host("vms.tasks.vms_sample_task", SANDBOX_SAMPLE_SECONDS),
    "vms-reconcile": _on_every_host("vms.tasks.vms_reconcile_task", SANDBOX_RECONCILE_SECONDS),
    # Any worker: hosts whose heartbeat stopped are marked down and their VMs `unknown`.
    "hosts-check": {
        "task": "vms.tasks.hosts_check_task",
        "schedule": SANDBOX_RECONCILE_SECONDS,
        "options": {"queue": "shared", "expires": SANDBOX_RECONCILE_SECONDS * 2},
    },
}
# Audit rows join the hash chain right after their transaction commits; this periodic sealer
# catches any that did not (accounts/audit.py). ``audit_verify`` fails on rows still unsealed
# after the grace time.
SANDBOX_AUDIT_SEAL_SECONDS = env.float("SANDBOX_AUDIT_SEAL_SECONDS", default=60.0)
SANDBOX_AUDIT_SEAL_GRACE_SECONDS = env.float("SANDBOX_AUDIT_SEAL_GRACE_SECONDS", default=600.0)
# A web process seals its requests' audit rows this long after the first response that left
# some, all of that moment's in one transaction (accounts.audit.audit_seal_soon); 0: each
# request's own right after its response.
SANDBOX_AUDIT_SEAL_DELAY_SECONDS = env.float("SANDBOX_AUDIT_SEAL_DELAY_SECONDS", default=0.2)
CELERY_BEAT_SCHEDULE["audit-seal"] = {
    "task": "accounts.tasks.audit_chain_seal_task",
    "schedule": SANDBOX_AUDIT_SEAL_SECONDS,
    "options": {"queue": "shared", "expires": SANDBOX_AUDIT_SEAL_SECONDS * 2},
}

# --- networking ---------------------------------------------------------------------------
# Give every new VM a NIC on the default network (off: VMs without network devices).
SANDBOX_NETWORKING = env.bool("SANDBOX_NETWORKING", default=True)
# Namespace (a name under /run/netns) holding our bridges, TAPs, nftables tables and VMMs;
# empty = the host namespace. Tests set it to a namespace they create.
SANDBOX_NETNS = env.str("SANDBOX_NETNS", default="")
SANDBOX_NETWORK_DEFAULT_CIDR = env.str("SANDBOX_NETWORK_DEFAULT_CIDR", default="10.231.0.0/24")
SANDBOX_NETWORK_DEFAULT_EGRESS = env.str("SANDBOX_NETWORK_DEFAULT_EGRESS", default="allow")  # allow|deny|allowlist
# Private networks users create themselves: at most this many per user, subnets (of
# SANDBOX_USER_NETWORK_PREFIX by default) inside this pool, which must not overlap the host's.
SANDBOX_USER_MAX_NETWORKS = env.int("SANDBOX_USER_MAX_NETWORKS", default=3)
SANDBOX_USER_NETWORK_POOL = env.str("SANDBOX_USER_NETWORK_POOL", default="10.232.0.0/16")
SANDBOX_USER_NETWORK_PREFIX = env.int("SANDBOX_USER_NETWORK_PREFIX", default=24)
# ... and their optional IPv6 prefixes (dual-stack) inside this one (unique local addresses).
SANDBOX_USER_NETWORK_POOL6 = env.str("SANDBOX_USER_NETWORK_POOL6", default="fd00:232::/48")
# Guests never reach link-local (169.254.0.0/16: cloud metadata), private ranges, or the host's
# own networks, whatever their egress policy; except these destinations (CIDRs), opened by an
# operator (e.g. an internal package mirror). See docs/networking.md.
SANDBOX_EGRESS_EXCEPTIONS = env.list("SANDBOX_EGRESS_EXCEPTIONS", default=[])
for _cidr in SANDBOX_EGRESS_EXCEPTIONS:
    try:
        ipaddress.ip_network(_cidr, strict=False)
    except ValueError as _exc:
        raise ImproperlyConfigured(f"SANDBOX_EGRESS_EXCEPTIONS: {_cidr!r} is not a CIDR") from _exc
# Turn on IPv4 forwarding in the namespace when rules are applied (needed for egress NAT and
# port forwards from other machines). It is namespace-wide: off leaves the host's setting alone.
SANDBOX_NETWORK_IP_FORWARD = env.bool("SANDBOX_NETWORK_IP_FORWARD", default=True)
# This host's underlay IPv4 address for the VXLAN tunnels of networks spanning hosts (UDP 4789
# between hosts; docs/scale-out.md). The worker's heartbeat records it on its Host row; empty:
# left as `manage.py host_join --tunnel-address` set it (none: the host takes no part).
SANDBOX_TUNNEL_ADDRESS = env.str("SANDBOX_TUNNEL_ADDRESS", default="")
if SANDBOX_TUNNEL_ADDRESS:
    try:
        SANDBOX_TUNNEL_ADDRESS = str(ipaddress.IPv4Address(SANDBOX_TUNNEL_ADDRESS))
    except ValueError as exc:
        raise ImproperlyConfigured(f"SANDBOX_TUNNEL_ADDRESS must be an IPv4 address: {exc}") from exc
_pf_range = env.str("SANDBOX_PORT_FORWARD_RANGE", default="20000-29999").split("-")
SANDBOX_PORT_FORWARD_RANGE = (int(_pf_range[0]), int(_pf_range[-1]))
if not 1 <= SANDBOX_PORT_FORWARD_RANGE[0] <= SANDBOX_PORT_FORWARD_RANGE[1] <= 65535:
    raise ImproperlyConfigured("SANDBOX_PORT_FORWARD_RANGE must be LOW-HIGH within 1-65535")
# Address shown (copyable) for port forwards; empty = the host's name.
SANDBOX_PORT_FORWARD_ADDRESS = env.str("SANDBOX_PORT_FORWARD_ADDRESS", default="")
SANDBOX_PORT_FORWARDS_PER_VM = env.int("SANDBOX_PORT_FORWARDS_PER_VM", default=16)

# --- host daemon, exec and files (docs/hostd.md, docs/exec-and-files.md) -----------------------
SANDBOX_HOSTD_SOCKET = Path(env.str("SANDBOX_HOSTD_SOCKET", default=str(SANDBOX_RUNTIME_DIR / "hostd.sock")))
# A group that may use hostd's socket too (0660): the web process's, when it runs unprivileged.
SANDBOX_HOSTD_SOCKET_GROUP = env.str("SANDBOX_HOSTD_SOCKET_GROUP", default="")
SANDBOX_HOSTD_SCAN_SECONDS = env.float("SANDBOX_HOSTD_SCAN_SECONDS", default=2.0)
# Across hosts (docs/scale-out.md): hostd's mutual-TLS listener for other hosts' web and worker
# processes ("host:port"; empty: the Unix socket only), and the CA and certificates for it.
SANDBOX_HOSTD_TLS_LISTEN = env.str("SANDBOX_HOSTD_TLS_LISTEN", default="")
SANDBOX_PKI_DIR = Path(env.str("SANDBOX_PKI_DIR", default=str(DATA_DIR / "pki")))
SANDBOX_CONSOLE_RING_BYTES = env.int("SANDBOX_CONSOLE_RING_BYTES", default=1 << 20)
SANDBOX_CONSOLE_LOG_MAX_BYTES = env.int("SANDBOX_CONSOLE_LOG_MAX_BYTES", default=16 << 20)
# New work is refused (507) when less than this is free (vms/host_disk.py).
SANDBOX_DISK_RESERVE_BYTES = env.int("SANDBOX_DISK_RESERVE_BYTES", default=1 << 30)
SANDBOX_DISK_RESERVE_PERCENT = env.int("SANDBOX_DISK_RESERVE_PERCENT", default=5)
SANDBOX_FILE_UPLOAD_MAX_BYTES = env.int("SANDBOX_FILE_UPLOAD_MAX_BYTES", default=1 << 30)
# Request bodies, checked by daphne as they arrive (sandbox_site/daphne_limits.py). 2 MiB: a
# 1 MiB inline exec stdin in JSON, with escaping.
SANDBOX_REQUEST_MAX_BYTES = env.int("SANDBOX_REQUEST_MAX_BYTES", default=2 << 20)
SANDBOX_ANONYMOUS_REQUEST_MAX_BYTES = env.int("SANDBOX_ANONYMOUS_REQUEST_MAX_BYTES", default=64 << 10)
# Responses and websocket messages: unsent bytes per connection before the sender waits.
SANDBOX_SEND_BUFFER_BYTES = env.int("SANDBOX_SEND_BUFFER_BYTES", default=256 << 10)
SANDBOX_SEND_STALL_SECONDS = env.float("SANDBOX_SEND_STALL_SECONDS", default=300.0)
SANDBOX_EXEC_BUFFER_BYTES = env.int("SANDBOX_EXEC_BUFFER_BYTES", default=1 << 20)
SANDBOX_EXEC_WAIT_MAX_SECONDS = env.float("SANDBOX_EXEC_WAIT_MAX_SECONDS", default=300.0)
SANDBOX_EXEC_WINDOW_BYTES = env.int("SANDBOX_EXEC_WINDOW_BYTES", default=256 * 1024)  # exec websocket flow control
# A kept exec websocket ("keep_open" start frames) closes when no next start frame comes in this time.
SANDBOX_EXEC_SOCKET_IDLE_SECONDS = env.float("SANDBOX_EXEC_SOCKET_IDLE_SECONDS", default=30.0)
SANDBOX_EXEC_WAITS_PER_USER = env.int("SANDBOX_EXEC_WAITS_PER_USER", default=32)  # per web process
# Background commands (exec with wait=false) running at once in one VM.
SANDBOX_EXEC_BACKGROUND_PER_VM = env.int("SANDBOX_EXEC_BACKGROUND_PER_VM", default=32)

# --- snapshots ------------------------------------------------------------------------------
# Snapshot files (frozen disk layers, saved VM state). Must be on the same filesystem as
# SANDBOX_RUNTIME_DIR: freezing a disk renames the VM's overlay into the snapshot.
SANDBOX_SNAPSHOT_DIR = Path(env.str("SANDBOX_SNAPSHOT_DIR", default=str(SANDBOX_RUNTIME_DIR.parent / "snapshots")))
SANDBOX_SNAPSHOTS_PER_VM = env.int("SANDBOX_SNAPSHOTS_PER_VM", default=32)
SANDBOX_CLONE_MAX = env.int("SANDBOX_CLONE_MAX", default=10)
SANDBOX_SNAPSHOT_RETENTION_SECONDS = env.float("SANDBOX_SNAPSHOT_RETENTION_SECONDS", default=300.0)
CELERY_BEAT_SCHEDULE["snapshots-retention"] = _on_every_host(
    "snapshots.tasks.snapshot_retention_task", SANDBOX_SNAPSHOT_RETENTION_SECONDS
)

# Golden snapshots (docs/snapshots.md#golden-snapshots): each host checks this often that every
# template that wants one has a current golden snapshot (built when missing or stale); a failed
# one is tried again after SANDBOX_GOLDEN_RETRY_SECONDS.
# SANDBOX_GOLDEN_AUTO_BUILD off: only on demand (admin action, `manage.py golden_build`).
SANDBOX_GOLDEN_AUTO_BUILD = env.bool("SANDBOX_GOLDEN_AUTO_BUILD", default=True)
SANDBOX_GOLDEN_MAINTAIN_SECONDS = env.float("SANDBOX_GOLDEN_MAINTAIN_SECONDS", default=30.0)
SANDBOX_GOLDEN_RETRY_SECONDS = env.float("SANDBOX_GOLDEN_RETRY_SECONDS", default=3600.0)
# Warm pools are refilled only while the host keeps this much memory free beyond its VMs
# (interim rule until host admission decides: snapshots.pool.pool_host_has_room).
SANDBOX_POOL_HOST_RESERVE_MIB = env.int("SANDBOX_POOL_HOST_RESERVE_MIB", default=1024)
CELERY_BEAT_SCHEDULE["snapshots-golden-maintain"] = _on_every_host(
    "snapshots.tasks.golden_maintain_task", SANDBOX_GOLDEN_MAINTAIN_SECONDS
)
