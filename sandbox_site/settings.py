"""Settings, all from the environment (see docs/configuration.md).

With nothing set, the site runs on an embedded default that behaves like production: SQLite
(WAL, immediate write transactions, a busy timeout) and a private Redis on a Unix socket that
``make run`` starts (scripts/run.sh) for the channel layer, the cache and Celery's broker. With
DATABASE_URL (PostgreSQL) and REDIS_URL it runs the production setup.
"""

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

DATA_DIR = Path(env.str("SANDBOX_DATA_DIR", default=str(BASE_DIR / "var")))

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
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
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "msbx",
        "TIMEOUT": 300,
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

# Lockout after repeated failed logins (dashboard, admin and HTTP basic alike).
SANDBOX_LOCKOUT_THRESHOLD = env.int("SANDBOX_LOCKOUT_THRESHOLD", default=5)
SANDBOX_LOCKOUT_SECONDS = env.int("SANDBOX_LOCKOUT_SECONDS", default=900)
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
    "DEFAULT_PAGINATION_CLASS": "sandbox_site.api_io.ApiPagination",
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
    "EXCEPTION_HANDLER": "sandbox_site.errors.api_exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_FILTER_BACKENDS": [],
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
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
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if env.bool("SANDBOX_BEHIND_PROXY", False) else None
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}

# --- microVMs ---------------------------------------------------------------------------
SANDBOX_HYPERVISOR = env.str("SANDBOX_HYPERVISOR", default="auto")  # auto | cloud-hypervisor | qemu
SANDBOX_CLOUD_HYPERVISOR_BINARY = env.str("SANDBOX_CLOUD_HYPERVISOR_BINARY", default="cloud-hypervisor")
# QEMU acceleration: auto = KVM only where it really runs ordinary guests, else TCG.
SANDBOX_ACCEL = env.str("SANDBOX_ACCEL", default="auto").strip().lower()
if SANDBOX_ACCEL not in ("auto", "kvm", "tcg"):
    raise ImproperlyConfigured(f"SANDBOX_ACCEL must be auto, kvm or tcg, not {SANDBOX_ACCEL!r}.")
SANDBOX_HOST_NAME = env.str("SANDBOX_HOST_NAME", default="local")
SANDBOX_RUNTIME_DIR = Path(env.str("SANDBOX_RUNTIME_DIR", default=str(DATA_DIR / "run")))
SANDBOX_IMAGE_DIR = Path(env.str("SANDBOX_IMAGE_DIR", default=str(DATA_DIR / "images")))
SANDBOX_BOOT_TIMEOUT = env.float("SANDBOX_BOOT_TIMEOUT", default=120.0)
SANDBOX_STOP_TIMEOUT = env.float("SANDBOX_STOP_TIMEOUT", default=30.0)
SANDBOX_RECONCILE_SECONDS = env.float("SANDBOX_RECONCILE_SECONDS", default=5.0)
SANDBOX_DEFAULT_QUOTA = {
    "max_vms": env.int("SANDBOX_DEFAULT_MAX_VMS", default=10),
    "max_vcpus": env.int("SANDBOX_DEFAULT_MAX_VCPUS", default=8),
    "max_memory_mib": env.int("SANDBOX_DEFAULT_MAX_MEMORY_MIB", default=8192),
    "max_disk_gib": env.int("SANDBOX_DEFAULT_MAX_DISK_GIB", default=100),
}
# Consoles: scrollback replayed to a new viewer, unacknowledged bytes in flight per viewer.
SANDBOX_CONSOLE_SCROLLBACK_BYTES = env.int("SANDBOX_CONSOLE_SCROLLBACK_BYTES", default=256 * 1024)
SANDBOX_CONSOLE_WINDOW_BYTES = env.int("SANDBOX_CONSOLE_WINDOW_BYTES", default=256 * 1024)
SANDBOX_CONSOLE_TICKET_SECONDS = env.int("SANDBOX_CONSOLE_TICKET_SECONDS", default=60)
SANDBOX_SAMPLE_SECONDS = env.float("SANDBOX_SAMPLE_SECONDS", default=10.0)
SANDBOX_SAMPLE_RETENTION_SECONDS = env.int("SANDBOX_SAMPLE_RETENTION_SECONDS", default=6 * 3600)
CELERY_BEAT_SCHEDULE = {
    "vms-sample": {
        "task": "vms.tasks.vms_sample_task",
        "schedule": SANDBOX_SAMPLE_SECONDS,
        "options": {"queue": f"host.{SANDBOX_HOST_NAME}", "expires": SANDBOX_SAMPLE_SECONDS * 2},
    },
    "vms-reconcile": {
        "task": "vms.tasks.vms_reconcile_task",
        "schedule": SANDBOX_RECONCILE_SECONDS,
        "options": {"queue": f"host.{SANDBOX_HOST_NAME}", "expires": SANDBOX_RECONCILE_SECONDS * 2},
    },
}

# --- networking ---------------------------------------------------------------------------
# Give every new VM a NIC on the default network (off: VMs without network devices).
SANDBOX_NETWORKING = env.bool("SANDBOX_NETWORKING", default=True)
# Namespace (a name under /run/netns) holding our bridges, TAPs, nftables tables and VMMs;
# empty = the host namespace. Tests set it to a namespace they create.
SANDBOX_NETNS = env.str("SANDBOX_NETNS", default="")
SANDBOX_NETWORK_DEFAULT_CIDR = env.str("SANDBOX_NETWORK_DEFAULT_CIDR", default="10.231.0.0/24")
SANDBOX_NETWORK_DEFAULT_EGRESS = env.str("SANDBOX_NETWORK_DEFAULT_EGRESS", default="allow")  # allow|deny|allowlist
# Turn on IPv4 forwarding in the namespace when rules are applied (needed for egress NAT and
# port forwards from other machines). It is namespace-wide: off leaves the host's setting alone.
SANDBOX_NETWORK_IP_FORWARD = env.bool("SANDBOX_NETWORK_IP_FORWARD", default=True)
_pf_range = env.str("SANDBOX_PORT_FORWARD_RANGE", default="20000-29999").split("-")
SANDBOX_PORT_FORWARD_RANGE = (int(_pf_range[0]), int(_pf_range[-1]))
if not 1 <= SANDBOX_PORT_FORWARD_RANGE[0] <= SANDBOX_PORT_FORWARD_RANGE[1] <= 65535:
    raise ImproperlyConfigured("SANDBOX_PORT_FORWARD_RANGE must be LOW-HIGH within 1-65535")
# Address shown (copyable) for port forwards; empty = the host's name.
SANDBOX_PORT_FORWARD_ADDRESS = env.str("SANDBOX_PORT_FORWARD_ADDRESS", default="")
SANDBOX_PORT_FORWARDS_PER_VM = env.int("SANDBOX_PORT_FORWARDS_PER_VM", default=16)

# --- host daemon, exec and files (docs/hostd.md, docs/exec-and-files.md) -----------------------
SANDBOX_HOSTD_SOCKET = Path(env.str("SANDBOX_HOSTD_SOCKET", default=str(SANDBOX_RUNTIME_DIR / "hostd.sock")))
SANDBOX_HOSTD_SCAN_SECONDS = env.float("SANDBOX_HOSTD_SCAN_SECONDS", default=2.0)
SANDBOX_CONSOLE_RING_BYTES = env.int("SANDBOX_CONSOLE_RING_BYTES", default=1 << 20)
SANDBOX_FILE_UPLOAD_MAX_BYTES = env.int("SANDBOX_FILE_UPLOAD_MAX_BYTES", default=1 << 30)
SANDBOX_EXEC_BUFFER_BYTES = env.int("SANDBOX_EXEC_BUFFER_BYTES", default=1 << 20)
SANDBOX_EXEC_WAIT_MAX_SECONDS = env.float("SANDBOX_EXEC_WAIT_MAX_SECONDS", default=300.0)

# --- snapshots ------------------------------------------------------------------------------
# Snapshot files (frozen disk layers, saved VM state). Must be on the same filesystem as
# SANDBOX_RUNTIME_DIR: freezing a disk renames the VM's overlay into the snapshot.
SANDBOX_SNAPSHOT_DIR = Path(env.str("SANDBOX_SNAPSHOT_DIR", default=str(SANDBOX_RUNTIME_DIR.parent / "snapshots")))
SANDBOX_SNAPSHOTS_PER_VM = env.int("SANDBOX_SNAPSHOTS_PER_VM", default=32)
SANDBOX_CLONE_MAX = env.int("SANDBOX_CLONE_MAX", default=10)
SANDBOX_SNAPSHOT_RETENTION_SECONDS = env.float("SANDBOX_SNAPSHOT_RETENTION_SECONDS", default=300.0)
CELERY_BEAT_SCHEDULE["snapshots-retention"] = {
    "task": "snapshots.tasks.snapshot_retention_task",
    "schedule": SANDBOX_SNAPSHOT_RETENTION_SECONDS,
    "options": {"queue": f"host.{SANDBOX_HOST_NAME}", "expires": SANDBOX_SNAPSHOT_RETENTION_SECONDS * 2},
}
